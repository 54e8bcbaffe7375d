"""The event stream: typed events, the hub that fans them out to sinks, and the probes that make them."""
