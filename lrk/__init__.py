"""lrk: a SIP media relay (RTP proxy) for the LRKProxy architecture."""

__version__ = "0.1.0"
