"""The cloud's side of the QR: an Orthanc plugin that opens one study for a node-signed token.

``film_token`` is shared with the kiosk (it signs what the plugin checks); ``film_page``
and ``film_plugin`` run inside Orthanc on the cloud (README.md here says how).
"""
