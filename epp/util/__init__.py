"""Small helpers shared by every component (no third-party heavy imports here)."""
