"""cl-agent: an online continual-learning agent for deployed vision streams."""

__version__ = "0.1.0"
