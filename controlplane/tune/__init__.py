"""`cpctl tune`: search a served model's batching, instances and precision variant under open-loop load.

`search` holds the search (points, config overrides through Triton's repository API, measurements with the
benchmark's open-loop generator, the choice), `pbtxt` writes the chosen config as config.pbtxt.
"""
