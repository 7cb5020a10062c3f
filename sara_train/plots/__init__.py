"""Images for people: the loss plot and the |w| histogram (matplotlib / Pillow)."""
