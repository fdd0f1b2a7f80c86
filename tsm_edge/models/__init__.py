"""Stage 1, models: the model registry, the temporal shift, the backbones, checkpoint layouts
and model resolution (name + checkpoint -> an ``nn.Module`` with its facts).
"""
