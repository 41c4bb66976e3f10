"""The tests' one harness: the real server on a loopback port, the in-process client, images, and Chromium."""
