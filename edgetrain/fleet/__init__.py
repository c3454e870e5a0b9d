"""Fleets: federated fine-tuning across boards on Flower.

`wire` (the config and weights that cross the network) and `partition` import neither torch nor
Flower; `ort_client` trains on a board without torch; `torch_client` plans and trains with
edgetrain; `server` runs the rounds (FedAvg or FedProx) with its state saved after every round;
`apps` builds Flower's ServerApp and ClientApp from them; `simulate` runs a whole fleet on one
machine with Flower's simulation engine and `processes` starts the real SuperLink and SuperNodes.
"""
