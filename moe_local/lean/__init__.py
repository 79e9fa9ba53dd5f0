"""The lean decode step (one token without transformers' dispatch) and its native operations."""
