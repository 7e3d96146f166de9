"""Publishing: figures for people to look at, cards from the Jinja templates in dataset_cards/, Hub pushes."""
