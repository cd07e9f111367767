"""polydiff audio: text-to-audio by mel-spectrogram diffusion and a vocoder.

Rooms, as in every modality: ``mel`` (the one mel-settings object), ``data`` (sound files in
and out of shards), ``synthetic`` (procedural sounds), ``model`` (mel denoisers),
``vocoder`` (Griffin-Lim and the trained neural vocoder), ``clap`` (CLAP conditioning and
re-ranking), ``pipeline`` (generation), ``export`` (WAV / FLAC / mel PNG), ``metrics`` and
``recipe`` (the modality for the trainer and the CLI).
"""
