"""Stage 3: product-level split, multi-path candidate mining, listwise target selection, triplets and hard negatives.

`split` assigns products to train/val by group; `embed` computes per-product image and caption embeddings;
`candidates` mines and samples candidates inside each split; `select` is the listwise LMM stage; `export` writes
FashionMV's own layout; `report` measures the result.
"""
