"""How ``Store.neighbors`` feeds a RETRO model's retrieval input.

RETRO (Borgeaud et al. 2021, §2.2-2.4) splits an input of L tokens into
C = L / 64 chunks; for each chunk it encodes k retrieved neighbours, each 128
tokens long (the neighbour chunk then its continuation), with a bidirectional
encoder, and the decoder attends to them through chunked cross-attention.
``Neighbors.tokens`` has exactly that layout: ``(B, C, k, 2 * 64)``.

This script builds (or reuses) a store from the shipped sample corpus, takes
two 256-token windows of a document as the language model's input, retrieves
k = 2 neighbours per chunk (excluding the document the input came from, as in
RETRO training) and shows the arrays a model would consume. It needs only
numpy; if PyTorch is installed it also shows the zero-copy hand-off, without
making torch a dependency of retrostore.

Run:  python examples/retro_model_input.py [STORE]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import retrostore
from retrostore.build import build_store

HERE = Path(__file__).resolve().parent
STORE = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo.rstore")
SEQ_LEN = 256  # tokens of LM input per row; 4 chunks of 64
K = 2  # neighbours per chunk, as RETRO trains

if not (STORE / "manifest.json").exists():
    build_store(STORE, [HERE / "pydocs-sample.jsonl.zst"], progress=False)

with retrostore.open(STORE) as store:
    # The LM's input: token ids in the store's chunk-tokenizer space. Here two
    # windows of one stored document; in training they are your training batch.
    for doc_id in range(store.info()["documents"]):
        doc = store.get_document(doc_id)
        ids, _offsets = store.chunker.encode(doc.text)
        if len(ids) >= 2 * SEQ_LEN:
            break
    else:
        sys.exit(f"{STORE} holds no document of {2 * SEQ_LEN} tokens; build it from the sample corpus")
    batch = np.stack([ids[:SEQ_LEN], ids[SEQ_LEN : 2 * SEQ_LEN]])  # (B=2, L=256)

    nb = store.neighbors(batch, k=K, exclude_doc_ids=[doc.doc_id, doc.doc_id])

    B, C, k, T2 = nb.tokens.shape
    print(f"input tokens          {batch.shape}   (B, L)")
    print(f"retrieval tokens      {nb.tokens.shape} (B, C, k, 2*64) int64, padded with id "
          f"{store.manifest['tokenizer']['pad_id']}")
    print(f"retrieval mask        {nb.mask.shape} bool")
    print(f"neighbour chunk ids   {nb.chunk_ids.shape} int64, -1 where missing")
    print(f"neighbour documents   {sorted(set(nb.doc_ids.ravel().tolist()))} (never doc {doc.doc_id})")

    # What the RETRO encoder sees for the first chunk's first neighbour:
    first = nb.tokens[0, 0, 0][nb.mask[0, 0, 0]]
    print("\nchunk 0 of row 0 :", store.chunker.decode(batch[0, :64])[:100], "...")
    print("its neighbour    :", store.chunker.decode(nb.tokens[0, 0, 0, :64])[:100], "...")
    print("+ continuation   :", store.chunker.decode(nb.tokens[0, 0, 0, 64:])[:100], "...")
    print(f"({len(first)} real tokens of {T2})")

    # RETRO's chunked cross-attention uses the neighbours of chunk u for chunk u+1
    # (causality); a model usually reshapes to (B * C, k, 2 * 64) for its encoder:
    encoder_input = nb.tokens.reshape(B * C, k, T2)
    encoder_mask = nb.mask.reshape(B * C, k, T2)
    print(f"\nencoder input {encoder_input.shape}, mask {encoder_mask.shape}")

    try:
        import torch  # optional: not a retrostore dependency
    except ImportError:
        print("(PyTorch not installed: torch.from_numpy(nb.tokens) would hand these over without a copy)")
    else:
        t = torch.from_numpy(nb.tokens)  # shares memory with the numpy array
        print(f"torch tensor {tuple(t.shape)} {t.dtype}")
