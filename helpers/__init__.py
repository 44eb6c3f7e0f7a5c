"""Row functions, presets, data sources and the offline test model of the captioning pipeline."""
