"""Peer servers for the `peers` suite (bench/peers/suite.py): each app runs in the peer's own venv."""
