"""``runner report``: what a run did, for people and programs.

data         totals, timing, spend (read from the ledger)
failures     failure groups (what their messages share, per endpoint)
outlook      what a resume would do
invocations  one line per `runner run` on the directory (run ids, run.json)
timeline     completions, failures and spend per time bucket, from the events
text         the text and JSON renderings
html         the self-contained page
panels       the page's invocations, charts over time and safety sections
charts       pure inline-SVG charts
assets       the page's CSS and script
gallery      the gallery's jobs and output thumbnails
cards        the gallery's JSON, one card per job
pairs        an edit's input images, its "before"
"""
