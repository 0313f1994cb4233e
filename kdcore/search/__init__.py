"""Teacher configuration search: candidate teachers are judged by the gain a proxy
student gets from distilling them, under a compute budget, by successive halving."""
