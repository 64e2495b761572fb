"""Synthetic BEN-L and EuroSAT-L sample data (see README.md) and the script that generates it."""
