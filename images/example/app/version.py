"""The version the example serves on /version. Tests (and you) edit this to see a reload."""

VERSION = "1"
