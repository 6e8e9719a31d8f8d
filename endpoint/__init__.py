"""The Tether endpoint: a daemon that runs tasks where it is deployed (``tether endpoint ...``)."""
