"""DNS load: prebuilt queries and raw-reply classification (:mod:`.wire`), open-loop schedules
(:mod:`.schedule`), the sender (:mod:`.sender`), latency histograms (:mod:`.histogram`) and the
Locust side (:mod:`.users`)."""
