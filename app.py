"""rft-hub: the Chalice app. Routes live in blueprints under chalicelib/api; the
non-HTTP handlers below are one call each into chalicelib."""
from chalice import Chalice

from chalicelib.api import admin, files, health, jobs

app = Chalice(app_name="rft-hub")
# Multipart uploads must reach the Lambda byte-exact (API Gateway base64-encodes binary types).
app.api.binary_types.append("multipart/form-data")

for blueprint in (health.bp, admin.bp, files.bp, jobs.bp):
    app.register_blueprint(blueprint)
