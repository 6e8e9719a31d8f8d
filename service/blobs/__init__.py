"""Blobs: arguments, results and function bodies too large for a WebSocket frame.

They are streamed through the service over plain HTTP and kept as files under
``<service home>/blobs/``, never whole in the service's memory: an upload is written to disk
and hashed chunk by chunk as it arrives (``request.stream()``), a download is a file response.
Frames carry only a small reference (:func:`tether.protocol.blob_stub`).

Who may do what (every request authenticated, by a user's token or an endpoint's credential):

* a user declares (``POST /v1/blobs``), uploads, reads and deletes their own blobs only;
* a task names the blobs it uses (``Task.blobs``) and is accepted only if its submitter owns
  each one, complete (:meth:`.index.BlobIndex.owned`, called by the relay);
* an endpoint reads a blob only while an open task dispatched to it names it, and writes a
  result blob only for an open task it holds; that blob belongs to the task's owner.

Limits are checked on the declared size before any byte moves: ``max_blob_bytes`` (413) and a
per-user quota of stored bytes (429), in words. A blob lives as long as the tasks that name it
(the store's purge, with its retention periods, removes the tasks; :meth:`.index.BlobIndex.purge`
then removes blobs no task names any more); an upload that breaks off is deleted at once, and
one declared or stored but never named by a task is deleted after ``orphan_s``.

One module per idea:

* ``index.py``: :class:`~.index.BlobIndex`, the blobs' rows and files (limits, quotas,
  ownership, links to tasks, purge), and :class:`~.index.Principal`, who asks;
* ``arrival.py``: :class:`~.arrival.Arrival`, an upload under way, which readers follow;
* ``routes.py``: the ``/v1/blobs`` routes, and bytes moved through ASGI (small transfers);
* ``raw_transfer.py``: bytes moved on the connection's own socket, in a thread (large ones);
* ``direct_file.py``: a file written past the page cache, for those raw uploads.
"""
