from client.canvas import Signature, chain, chord, group, signature  # noqa: F401

from celery._compat import missing, sdk

_chain = chain
StampingVisitor = sdk("canvas", "StampingVisitor", "canvas.StampingVisitor")
maybe_signature = sdk("canvas", "maybe_signature", "canvas.maybe_signature")
