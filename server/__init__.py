"""kvserve's HTTP server and command line."""
