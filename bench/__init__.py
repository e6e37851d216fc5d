"""prefopt benchmark suite (issue #6): `python -m bench` or `prefopt bench`. See bench/__main__.py."""
