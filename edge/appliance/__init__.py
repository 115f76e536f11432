"""The appliance's boot slots: what is installed where, and how an update gets there.

Stdlib only: image/build.sh runs these modules with the build host's python3, before any
venv exists, and the node imports them to say which slot and version it is running.
"""
