"""Reliability scenarios that print figures: overload, soak (and the helpers they share)."""
