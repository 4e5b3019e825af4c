"""Neural-network parts of a capsule network: squash, convolutional features, capsule layers, decoder."""
