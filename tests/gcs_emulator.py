"""A local Cloud Storage for tests: `python tests/gcs_emulator.py PORT BUCKET` serves the JSON API
from memory (the gcp-storage-emulator package) with BUCKET created.

One addition: the emulator answers object downloads without the `x-goog-generation` header, which
TensorStore (so Orbax) requires when it reads an object back ("Malformed StorageGeneration"); Cloud
Storage always sends it. It is added here from the object's metadata.
"""
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status.value in (200, 206):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = download  # before the server module builds its routing table from it

if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main
  port, bucket = sys.argv[1:3]
  main(["start", f"--port={port}", "--in-memory", f"--default-bucket={bucket}"])
