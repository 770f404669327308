"""Tests of maisi.families."""
