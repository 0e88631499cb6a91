"""``runner report``: what a run did, for people and programs.

data      totals, timing, spend (read from the ledger)
failures  failure groups
outlook   what a resume would do
text      the text and JSON renderings
html      the self-contained page
assets    the page's CSS and script
gallery   output thumbnails
"""
