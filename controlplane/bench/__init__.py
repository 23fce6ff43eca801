"""Load generation and benchmark reports (`cpctl bench`)."""
