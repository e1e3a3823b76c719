"""Content-addressed files and how they move: stores, the data server, the fetcher."""
