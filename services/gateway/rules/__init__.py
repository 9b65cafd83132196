"""User rules and their traces."""
