"""Hydra configuration files of prism (shipped as package data so wheels find them)."""
