"""Request handlers, pure: decode a request, call the state, build the reply.

``binary`` answers the binary protocol's ops, ``admin`` the admin text
commands (also reached through the binary ADMIN op), ``views`` holds the
frozen read models that admin, HTTP and the web page render.  No trio and no
clock here: the runtime passes ``now`` in and sends what comes back.
"""
