"""Pure-torch core of tagray: tags, splicing, heads, losses, data, artifacts. No Ray imports here."""
