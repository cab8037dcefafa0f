"""Tests of :mod:`sockshare.carriers`, on the real kernel facilities."""
