from lwm_data.cli.main import main

main()
