"""Images for people: the loss plot, the |w| histogram and the small-weight persistence plot (matplotlib / Pillow)."""
