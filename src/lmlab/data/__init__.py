"""Data: corpora, sources, shards, chat and preference examples, curation.

Two constants every consumer of labelled tokens shares:"""

IGNORE_INDEX = -100  # a target position that contributes no loss (prompt, padding)
PAD_DOC = -1  # the document id of padding positions in a packed row
