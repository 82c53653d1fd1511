"""Storage layer, input side: the formats raw data comes in (``sources``: CSV, JSON Lines,
JSON arrays, Parquet, text; ``squad``: SQuAD's nested JSON; ``tmx``: translation memories)."""
