"""fal's public base URLs: the defaults of the flags that point the runner elsewhere.

A module of constants only, so that the command line's parser reads them without importing
the configuration's models.
"""

FAL_QUEUE_URL = "https://queue.fal.run"
FAL_REST_URL = "https://rest.fal.ai"
FAL_CDN_URL = "https://v3.fal.media"
FAL_JWKS_URL = "https://rest.fal.ai/.well-known/jwks.json"
FAL_API_URL = "https://api.fal.ai"  # the Platform API (request history, prices)
