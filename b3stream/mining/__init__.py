"""Offline batch mining (B3 and baselines). Each stage reads files and writes files; mining never imports
the trainer."""
