"""Regenerates flux2.parquet, the FLUX.2 example, with real nested columns.

Run from this folder: python make_flux2_parquet.py
"""

import pyarrow as pa
import pyarrow.parquet as pq

lora = pa.struct([("path", pa.string()), ("scale", pa.float64())])
schema = pa.schema(
    [
        ("id", pa.string()),
        ("endpoint", pa.string()),
        ("prompt", pa.string()),
        ("image_size", pa.string()),
        ("image_urls", pa.list_(pa.string())),
        ("loras", pa.list_(lora)),
        ("num_images", pa.int64()),
        ("seed", pa.int64()),
        ("collection", pa.string()),
    ]
)
rows = [
    (
        "f2-01",
        "fal-ai/flux-2/lora",
        "A ceramic vase with dried flowers, soft light",
        "square_hd",
        None,
        [{"path": "owner/ceramics-lora", "scale": 0.9}],
        4,
        31,
        "autumn",
    ),
    (
        "f2-02",
        "fal-ai/flux-2/lora",
        "A linen sofa in a Scandinavian living room",
        "1536x1024",
        None,
        None,
        1,
        32,
        "autumn",
    ),
    (
        "f2e-01",
        "fal-ai/flux-2/lora/edit",
        "Use the fabric of the second image on the first sofa",
        None,
        ["images/sofa.jpg", "images/sofa_pink.webp"],
        [{"path": "owner/fabric-lora", "scale": 1.0}],
        1,
        33,
        "fabrics",
    ),
    (
        "f2e-02",
        "fal-ai/flux-2/lora/edit",
        "Place this chair in a sunlit loft",
        "1024x768",
        ["images/chair.jpg"],
        None,
        2,
        34,
        "fabrics",
    ),
]
table = pa.Table.from_pylist([dict(zip(schema.names, r, strict=True)) for r in rows], schema=schema)
pq.write_table(table, "flux2.parquet", row_group_size=2)
