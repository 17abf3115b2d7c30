"""The Keras network: backbones, building, saving and loading, folding for inference, engine specs."""
