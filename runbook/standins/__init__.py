"""Local stand-ins for the cloud services tern drives (AWS, Heroku): real protocols on 127.0.0.1,
as strict as the services' documentation, shared by the rehearsal and the tests."""
