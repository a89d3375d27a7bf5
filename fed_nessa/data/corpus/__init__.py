"""A many-voice real-model corpus: Kokoro-82M blends, degraded, embedded by CAM++, GE2E and the VFL d-vector.

``pins`` (what is fetched, by name, version and hash), ``fetch`` (downloads to a
cache outside the repository), ``voices`` (blend packing and the held-out split
by parent packs), ``texts``, ``degrade`` (the real-voices degradation),
``build`` (resumable per voice) and ``store`` (the committed folder and its
checked loader). Nothing heavy is imported here.
"""
