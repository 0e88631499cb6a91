"""What fal offers and what it costs: endpoint facts, request models, prices, image headers.

    limits       endpoint ids, presets and ranges as data, with provenance
    fields       field value types (image sizes, LoRA weights, ...)
    catalog      one frozen request model per endpoint; output-size rules
    diagnostics  validation errors as sentences
    cost         prices as data, pure Decimal estimate and billed cost
    imageinfo    image dimensions and format from a header

The bottom stage: it imports nothing of the runner but :mod:`runner.errors`.
"""
