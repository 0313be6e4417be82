"""``tuneforge studio``: plan, check data, train, watch, compare, chat and export from a browser.

A Gradio page over the library (``pip install 'tuneforge[studio]'``): the form is generated from the method and
objective registries and validated by ``RunConfig``; runs are ``tuneforge train`` processes writing ordinary run
folders in the workspace; the chat uses ``tuneforge serve``'s engine. See docs/studio.md.
"""
