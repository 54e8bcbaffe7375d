"""The event stream: typed events, the tag vocabulary, the hub that fans events out to sinks, the console."""
